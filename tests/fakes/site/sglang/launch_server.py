"""Stand-in for SGLang's launch_server module: runs tests/fakes/sglang_server.py."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 2))
from sglang_server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
