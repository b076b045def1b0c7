"""`python -m services.supervisor` is `meshserve`: the supervisor is the root of the
mesh, not a supervised service, so it does not go through ``shared.service.serve``
(it installs its own signal handling to stop the children in order)."""

import sys

from services.supervisor.cli import main

sys.exit(main())
