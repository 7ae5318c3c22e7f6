"""python -m trackstar_db.cli"""

from trackstar_db.cli import main

main()
