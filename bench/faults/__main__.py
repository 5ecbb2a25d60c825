import sys

from bench.faults.suite import main

sys.exit(main())
