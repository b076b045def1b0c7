"""``python -m services.api``: the OpenAI-compatible HTTP gateway."""

from services.api.server import main
from shared.service import serve

if __name__ == "__main__":
    serve("api", main)
