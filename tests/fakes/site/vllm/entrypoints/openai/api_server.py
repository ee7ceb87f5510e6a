"""Stand-in for vLLM's OpenAI server module: runs tests/fakes/vllm_server.py."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 4))
from vllm_server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
