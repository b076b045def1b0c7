"""``python -m services.tokenizer``: one tokenizer replica."""

from services.tokenizer.service import main
from shared.service import serve

if __name__ == "__main__":
    serve("tokenizer", main)
