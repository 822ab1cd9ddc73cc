from sherl_pipe.cli import main

main()
