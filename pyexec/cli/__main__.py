from pyexec.cli import main

main()
