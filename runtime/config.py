"""Model configuration: the architecture-independent description the runtime executes.

Every supported architecture (Llama family, OPT) is described by the same fields; the differences
between architectures are values here (norm kind, activation, positions, biases), never branches
on an architecture name inside the runtime.
"""

from dataclasses import asdict, dataclass, field, fields

from .errors import FormatError

NORMS = ("rms", "layer")
ACTIVATIONS = ("silu", "relu")
POSITIONS = ("rope", "learned")


def _index(v, n):
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n


@dataclass
class ModelConfig:
    arch: str  # family name, informative only ("llama", "qwen2", "mistral", "opt")
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    max_context: int
    norm: str = "rms"  # "rms" (weight only) or "layer" (weight and bias)
    norm_eps: float = 1e-5
    activation: str = "silu"
    gated_ffn: bool = True  # gate/up/down (Llama) or fc1/fc2 (OPT)
    positions: str = "rope"  # "rope" or "learned"
    pos_offset: int = 0  # learned positions: row of position 0 (OPT stores 2 padding rows first)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling dict (type "linear" or "llama3"), or None
    qkv_bias: bool = False
    o_bias: bool = False
    ffn_bias: bool = False  # bias on up (fc1) and down (fc2)
    tied_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)

    def __post_init__(self):
        def bad(msg):
            raise FormatError("config", msg)

        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "vocab_size", "max_context"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"{name} must be a positive integer, got {v!r}")
        for name in ("gated_ffn", "qkv_bias", "o_bias", "ffn_bias", "tied_embeddings"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                bad(f"{name} must be a positive number, got {v!r}")
        if not isinstance(self.pos_offset, int) or self.pos_offset < 0:
            bad(f"pos_offset must be an integer >= 0, got {self.pos_offset!r}")
        if self.rope_scaling is not None:
            self._check_rope_scaling(bad)
        if self.bos_token_id is not None and not _index(self.bos_token_id, self.vocab_size):
            bad(f"bos_token_id must be null or a token id below vocab_size ({self.vocab_size}), "
                f"got {self.bos_token_id!r}")
        if not isinstance(self.eos_token_ids, list) or not all(
                _index(t, self.vocab_size) for t in self.eos_token_ids):
            bad(f"eos_token_ids must be a list of token ids below vocab_size ({self.vocab_size}), "
                f"got {self.eos_token_ids!r}")
        if self.ffn_bias and self.gated_ffn:
            bad("ffn_bias is only supported with an ungated FFN (OPT)")
        if self.norm not in NORMS:
            bad(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            bad(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.positions not in POSITIONS:
            bad(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.positions == "rope" and self.head_dim % 2:
            bad(f"rotary embeddings need an even head_dim, got {self.head_dim}")

    def _check_rope_scaling(self, bad):
        """The rope_scaling dict holds what runtime/kernels/reference.rope_inv_freq reads."""
        r = self.rope_scaling
        if not isinstance(r, dict):
            bad("rope_scaling must be an object or null")
        kind = r.get("rope_type", r.get("type"))
        need = {None: (), "default": (), "linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}
        if kind not in need:
            bad(f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)")
        for k in need[kind]:
            v = r.get(k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
                bad(f"rope_scaling.{k} must be a positive number, got {v!r}")
        if kind == "llama3" and r["low_freq_factor"] == r["high_freq_factor"]:
            bad("rope_scaling low_freq_factor and high_freq_factor must differ")

    @property
    def q_dim(self):
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d, path="manifest.json"):
        if not isinstance(d, dict):
            raise FormatError(path, "config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise FormatError(path, f"config has unknown keys {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise FormatError(path, f"config is incomplete: {e}") from None
        except FormatError as e:
            raise FormatError(path, str(e).split(": ", 1)[1]) from None
