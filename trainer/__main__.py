from comms import dist_utils
from trainer.train import main

dist_utils.exit_process(main())
