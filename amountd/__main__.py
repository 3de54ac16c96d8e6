# Signals first: a SIGINT during the imports below must not raise in them (interrupt.py).
from .interrupt import arm

arm()

from .cli import main  # noqa: E402

raise SystemExit(main())
