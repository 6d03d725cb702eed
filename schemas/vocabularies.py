"""Default zero-shot vocabularies: the 80 COCO object names and a Places365-style scene list."""

COCO_OBJECTS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# A subset of the Places365 categories, covering the scenes common in user video.
PLACES_SCENES: tuple[str, ...] = (
    "airport terminal", "alley", "amusement park", "aquarium", "art gallery", "art studio",
    "auditorium", "bakery", "ballroom", "bar", "barn", "baseball field", "basketball court",
    "bathroom", "beach", "bedroom", "boardwalk", "boat deck", "bookstore", "bowling alley",
    "boxing ring", "bridge", "building facade", "bus station", "butchers shop", "cafeteria",
    "campsite", "canyon", "car interior", "casino", "castle", "cathedral", "cemetery",
    "church interior", "classroom", "clean room", "closet", "coast", "cockpit", "coffee shop",
    "computer room", "concert hall", "conference room", "construction site", "corridor",
    "courtyard", "crosswalk", "dance studio", "desert", "dining room", "dressing room",
    "downtown", "elevator", "factory", "farm", "field", "fire station", "flea market", "florist shop",
    "food court", "football field", "forest", "forest path", "garage", "garden", "gas station",
    "glacier", "golf course", "greenhouse", "gymnasium", "hair salon", "harbor", "highway",
    "home office", "hospital room", "hotel room", "ice rink", "igloo", "jail cell", "kitchen",
    "laboratory", "lake", "laundromat", "lawn", "library", "lighthouse", "living room",
    "locker room", "market", "mountain", "movie theater", "museum", "music studio", "nursery",
    "ocean", "office", "operating room", "parking lot", "pasture", "playground", "pier",
    "pharmacy", "pond", "restaurant", "restaurant kitchen", "river", "rock arch", "runway",
    "sky", "ski slope", "skyscraper", "snowfield", "soccer field", "stadium", "stage",
    "staircase", "street", "subway station", "supermarket", "swimming pool", "television studio",
    "tennis court", "train station", "tree farm", "underwater", "vegetable garden", "volcano",
    "waiting room", "waterfall", "wheat field", "wind farm", "yard",
)

OBJECT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a video frame showing a {}.")
SCENE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a video taken in a {}.")
