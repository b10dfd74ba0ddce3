from latentem.cli import main

raise SystemExit(main())
