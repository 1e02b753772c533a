from anybit.cli import main

raise SystemExit(main())
