import os
import sys

# Benchmarks import medvl from the installed (editable) package, like the tests.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
