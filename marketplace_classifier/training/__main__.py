from marketplace_classifier.training.cli import main

raise SystemExit(main())
