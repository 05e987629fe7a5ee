from als.store.daemon import main

raise SystemExit(main())
