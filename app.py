"""The Hugging Face Space entry point: `python app.py` serves the aksis demo. The app lives in aksis.ui."""

from aksis.ui import main

if __name__ == "__main__":
    main()
