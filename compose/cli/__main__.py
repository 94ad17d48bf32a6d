from loracompose.cli.main import main

raise SystemExit(main())
