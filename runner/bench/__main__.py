import sys

from runner.bench.run import main

sys.exit(main())
