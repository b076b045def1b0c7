"""``python -m services.tts``: one tts replica (its engine processes are its children)."""

from services.tts.service import main
from shared.service import serve

if __name__ == "__main__":
    serve("tts", main)
