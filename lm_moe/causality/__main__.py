import sys

from lm_moe.causality.report import main

sys.exit(main())
