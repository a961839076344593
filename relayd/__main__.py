"""python -m relayd -> cli.main()"""
from relayd.cli import main

raise SystemExit(main())
