"""``python -m services.worker``: one GPU (or CPU) worker replica."""

from services.worker.service import main
from shared.service import serve

if __name__ == "__main__":
    serve("worker", main)
