from ccidbridge.cli import main

raise SystemExit(main())
