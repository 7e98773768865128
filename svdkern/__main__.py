"""`python -m svdkern`: the training application (`svdkern.app.cli`)."""
import sys

from .app import missing_dependency

why = missing_dependency()
if why is not None:
    sys.exit(why)

from .app.cli import main  # noqa: E402  (after the dependency check)

sys.exit(main())
