"""``python -m dicom_node.cli``: the ``coronet`` command."""

import sys

from dicom_node.cli import main

sys.exit(main())
