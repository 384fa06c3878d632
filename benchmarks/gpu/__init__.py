"""The one-command GPU session (``bash benchmarks/gpu_session.sh``): one module per part, plus the shared
plumbing (``common``) and the session's bookkeeping (``session``). See the script's header."""
