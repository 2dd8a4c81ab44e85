import sys

from flow_nexus_server.cli import main

sys.exit(main())
