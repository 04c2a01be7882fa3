from pefref.cli.entry import main

main()
