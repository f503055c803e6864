from tenancy_operator.cli import main

raise SystemExit(main())
