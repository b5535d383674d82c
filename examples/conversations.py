"""One model, many conversations: load the model once and serve several users from threads.

Each conversation has its own KV cache (edgellm.chat.Conversation makes one), so a user's next
turn reuses that user's cache even when other conversations ran in between. A Model runs one
generation at a time: every thread takes the model's lock for a whole answer.

    python examples/conversations.py [MODEL_DIR]
"""

import json
import sys
import threading

import edgellm
from edgellm.chat import Conversation
from edgellm.models import demo_model_path
from edgellm.sampling import SamplingParams

USERS = {
    "anne": ["Who is Mr Darcy?", "What does Elizabeth think of him?"],
    "ben": ["Describe the ball.", "Who danced first?"],
    "cleo": ["Tell me about Pemberley.", "Who lives there?"],
}


def main():
    model = edgellm.load(sys.argv[1] if len(sys.argv) > 1 else demo_model_path())
    lock = threading.Lock()  # one per model
    results = {}

    def serve(user, questions):
        conv = Conversation(model, max_tokens=24, params=SamplingParams(temperature=0))
        for i, question in enumerate(questions):
            with lock:
                answer = "".join(conv.ask(question))
            turn = conv.turns[-1]
            results[user, i] = (answer.strip(), turn["cached_tokens"], turn["prefilled_tokens"])

    threads = [threading.Thread(target=serve, args=item) for item in USERS.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (user, i), (answer, cached, prefilled) in sorted(results.items()):
        print(f"{user} turn {i + 1} (cached {cached}, prefilled {prefilled}): {json.dumps(answer)}")


if __name__ == "__main__":
    main()
