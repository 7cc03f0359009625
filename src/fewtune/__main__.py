from fewtune.cli.app import main

main()
