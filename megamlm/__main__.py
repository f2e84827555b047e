from megamlm.cli import main

raise SystemExit(main())
