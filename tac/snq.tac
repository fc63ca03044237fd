# Run with:  twistd -ny tac/snq.tac   (SNQ_CONFIG=/etc/snq.toml to pick a file)
#
# A .tac file is for deployments that want to build the service tree
# themselves: add services next to snq, or choose logging here.
import os

from twisted.application.service import Application

from snq.tap import Options, makeService

options = Options()
options.parseOptions(["--config", os.environ["SNQ_CONFIG"]]
                     if os.environ.get("SNQ_CONFIG") else [])

application = Application("snq")
makeService(options).setServiceParent(application)
