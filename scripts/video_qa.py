"""Answer, score and time a video question set with a pruned VLM (same as ``vtprune video-qa``)."""

import sys

from vtprune.video_qa import main

if __name__ == "__main__":
    sys.exit(main())
