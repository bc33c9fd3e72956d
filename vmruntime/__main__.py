from vmruntime.cli import main

raise SystemExit(main())
