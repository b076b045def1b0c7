from services.kvcache.service import main
from shared.service import serve

serve("kvcache", main)
