"""Assembly of an llvmlite IR module for another CPU (tests that check which instructions a
kernel's IR becomes on aarch64, AVX2 or AVX-VNNI, from any host)."""

import pytest


def assembly(mod, triple, cpu, features):
    """mod (llvmlite.ir.Module) compiled by LLVM for (triple, cpu, features) -> its assembly;
    skips the test when this llvmlite lacks the target."""
    import llvmlite.binding as llb

    llb.initialize_all_targets()
    llb.initialize_all_asmprinters()
    try:
        target = llb.Target.from_triple(triple)
    except RuntimeError:
        pytest.skip(f"this llvmlite has no {triple} target")
    m = llb.parse_assembly(str(mod))
    m.triple = triple
    return target.create_target_machine(cpu=cpu, features=features, opt=2).emit_assembly(m)
