from orstack.cli import main

main()
