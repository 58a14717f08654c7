from vipd.daemon import main

raise SystemExit(main())
