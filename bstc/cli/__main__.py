from bstc.cli import main

main()
