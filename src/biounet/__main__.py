from biounet.cli import main

raise SystemExit(main())
