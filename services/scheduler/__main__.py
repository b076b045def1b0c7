from services.scheduler.service import main
from shared.service import serve

serve("scheduler", main)
