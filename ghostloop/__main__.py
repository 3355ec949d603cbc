from ghostloop.cli import main

raise SystemExit(main())
