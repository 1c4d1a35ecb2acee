import sys
import traceback

from lm_moe.causality.report import INTERNAL_FAILURE, main

try:
    sys.exit(main())
except Exception:  # a crash must not exit 1, which reports a leak
    traceback.print_exc()
    sys.exit(INTERNAL_FAILURE)
