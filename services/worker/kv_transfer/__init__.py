"""Moving a request's KV blocks between workers' caches (issue 12): ``state.py``
is the pure state machine, ``staging.py`` the copies, ``engine.py`` the ZMQ
shell, ``nccl.py`` the GPU-to-GPU data path."""
