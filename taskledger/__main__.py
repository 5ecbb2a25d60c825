from taskledger.cli import main

raise SystemExit(main())
