from alignloop.cli import main

raise SystemExit(main())
