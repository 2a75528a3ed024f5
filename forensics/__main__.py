from forensics.cli import main
import sys

sys.exit(main())
