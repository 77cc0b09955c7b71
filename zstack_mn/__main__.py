from zstack_mn.cli import main

main()
