"""Real English vocabulary for planted news titles: category -> subcategory -> topic words."""

TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "football": "quarterback touchdown playoffs coach linebacker stadium fumble kickoff rookie draft".split(),
        "basketball": "dunk rebound courtside playoffs guard center buzzer overtime arena coach".split(),
        "tennis": "serve racket grandslam tiebreak baseline volley wimbledon seed backhand champion".split(),
    },
    "finance": {
        "markets": "stocks bonds investors rally index shares dividend traders earnings wallstreet".split(),
        "banking": "mortgage loans interest deposits lender credit bank savings rates borrowers".split(),
        "crypto": "bitcoin blockchain token wallet exchange mining ethereum coins ledger crypto".split(),
    },
    "health": {
        "fitness": "workout exercise cardio muscles strength running yoga gym stretching endurance".split(),
        "medicine": "vaccine hospital doctors treatment patients clinical surgery disease therapy drug".split(),
        "nutrition": "protein vitamins diet calories sugar fiber vegetables supplements metabolism meals".split(),
    },
    "travel": {
        "destinations": "beaches islands resort cruise vacation paradise tourists sightseeing coast hotel".split(),
        "flights": "airline airport passengers boarding pilots runway luggage flight terminal airfare".split(),
        "outdoors": "hiking camping trails mountains canyon wilderness backpacking summit forest park".split(),
    },
    "foodanddrink": {
        "recipes": "recipe baking oven dough casserole roasted sauce dessert cookies bread".split(),
        "restaurants": "chef restaurant menu diners bistro reservation waiter cuisine tasting kitchen".split(),
        "drinks": "wine beer cocktail brewery whiskey vineyard coffee espresso bartender champagne".split(),
    },
    "autos": {
        "electric": "battery charging electric tesla range charger hybrid emissions plugin motor".split(),
        "trucks": "pickup truck towing diesel horsepower payload offroad tires engine hauling".split(),
        "recalls": "recall airbags defect safety regulators brakes steering dealers investigation fix".split(),
    },
    "weather": {
        "storms": "hurricane tornado storm flooding winds thunderstorm evacuation landfall rainfall surge".split(),
        "winter": "snow blizzard freezing ice frost snowfall chill sleet cold plows".split(),
        "heat": "heatwave drought wildfire scorching temperatures sunshine humidity dry blaze smoke".split(),
    },
    "entertainment": {
        "celebrity": "celebrity actress wedding divorce redcarpet paparazzi engaged glamour gossip star".split(),
        "royals": "royal prince princess queen palace duchess monarchy crown throne kingdom".split(),
        "awards": "oscars grammys nominations winners ceremony trophy award honorees gala nominee".split(),
    },
    "music": {
        "concerts": "concert tour festival stage tickets setlist encore crowd headliner venue".split(),
        "albums": "album single songwriter lyrics studio chart record release melody debut".split(),
        "classical": "orchestra symphony violin piano conductor opera composer cello sonata choir".split(),
    },
    "movies": {
        "blockbusters": "sequel boxoffice superhero franchise trailer premiere studio marvel villain budget".split(),
        "horror": "horror haunted ghost zombie slasher scream creepy monster nightmare terror".split(),
        "animation": "animated pixar disney cartoon animators voice family sequel characters magical".split(),
    },
    "tv": {
        "reality": "reality contestant elimination bachelor finale host competition voted island drama".split(),
        "dramas": "episode season showrunner finale cast series renewed cliffhanger streaming plot".split(),
        "latenight": "latenight comedian monologue guest talkshow host sketch interview jokes audience".split(),
    },
    "lifestyle": {
        "home": "decor furniture kitchen renovation garden bedroom cozy interior remodel design".split(),
        "parenting": "parents toddler kids school babysitter teenagers family children bedtime daycare".split(),
        "pets": "puppy kitten dog cat adoption shelter veterinarian rescue breed paws".split(),
    },
    "news": {
        "politics": "senate congress election president governor campaign voters debate ballot lawmakers".split(),
        "crime": "police arrested suspect robbery shooting detectives charged court jury sentenced".split(),
        "science": "scientists telescope planet astronauts fossils climate research galaxy nasa discovery".split(),
    },
    "technology": {
        "gadgets": "smartphone iphone laptop tablet headphones camera gadget android screen battery".split(),
        "internet": "online privacy hackers social media app google website data password".split(),
        "ai": "robot artificial intelligence algorithm automation chatbot machine learning neural software".split(),
    },
}

# Function words and generic news verbs: frequent in every topic, carrying no topic signal.
FILLERS = (
    "new the after why how what this year report says could first big top week day more best "
    "latest watch inside update today just now over about finally again ahead"
).split()

# ---- Word lists for the planted generators in rmbert.data.generators (invented names, generic phrasing) ----

# Given names (common, generic) and syllables for invented surnames, places and brands.
FIRST_NAMES = (
    "Adrian Alana Bianca Carlos Dana Declan Elena Felix Greta Hugo Imani Ivan Jonah Kara Leon Lucia "
    "Malik Mara Nadia Nico Omar Priya Quentin Rhea Silas Tamsin Ursula Victor Wren Yusuf Zara Tobias "
    "Ingrid Mateo Celeste Desmond Farah Gideon Hazel Idris Juno Keegan Lena Magnus Noor Otis Petra "
    "Rafael Sabine Theo Vera Wesley Yara Zeke Anya Bruno Clara Dmitri Esme"
).split()
NAME_HEADS = (
    "Ash Bel Bran Cal Cor Dal Dor Ell Fen Gal Har Hol Kes Kor Lan Lor Mad Mar Mor Nor Orl Pell Quar "
    "Ren Ros Sal Stan Tal Tor Val Vor Wes Wex Yar Zel Brom Crest Dun Grel"
).split()
SURNAME_TAILS = "wick ton ley ford ridge ski ova etti son man berg hurst low well more by dale field stein ardo ena vik".split()
PLACE_TAILS = "ville port haven burgh field mouth stead bury wood crest dale ton".split()
PLACE_PREFIXES = ["", "Port ", "Lake ", "North ", "South ", "East ", "West ", "New ", "Mount ", "Fort "]
BRAND_TAILS = "a ia ex on ix ora ium ant is eon".split()
TEAM_MASCOTS = (
    "Hawks Rangers Comets Wolves Titans Falcons Pirates Stallions Vipers Bears Owls Storm Foxes Giants "
    "Sharks Bulldogs Mustangs Cyclones"
).split()
# Organisation suffixes by category (a company, agency or group of that field).
ORG_SUFFIXES: dict[str, list[str]] = {
    "sports": ["Athletic Club", "Sports Group", "League"],
    "finance": ["Capital", "Bank", "Holdings", "Financial", "Securities"],
    "health": ["Health", "Clinic", "Pharma", "Medical", "Biotech"],
    "travel": ["Airlines", "Resorts", "Cruises", "Travel"],
    "foodanddrink": ["Foods", "Brewing", "Kitchen", "Vineyards", "Bakery"],
    "autos": ["Motors", "Automotive", "Trucks", "Auto Group"],
    "weather": ["Weather Service", "Climate Center", "Forecast Office", "Emergency Agency"],
    "entertainment": ["Studios", "Media", "Talent Agency", "Entertainment"],
    "music": ["Records", "Orchestra", "Music Group", "Band"],
    "movies": ["Pictures", "Studios", "Films"],
    "tv": ["Network", "Channel", "Television", "Productions"],
    "lifestyle": ["Home", "Living", "Designs", "Pet Rescue"],
    "news": ["Party", "Council", "Agency", "Department", "Institute"],
    "technology": ["Labs", "Systems", "Software", "Technologies", "Networks"],
}
# Generic news verbs and nouns: they carry no topic, so titles built from them and names are topic-neutral.
ENTITY_VERBS = (
    "signs wins loses faces announces rejects backs joins leaves plans denies confirms slams praises "
    "meets sues hires unveils delays cancels extends criticizes defends challenges"
).split()
ENTITY_NOUNS = (
    "deal statement talks move offer plan decision comeback setback criticism backlash rumors future "
    "partnership lawsuit split return contract visit warning response shakeup"
).split()
CONNECTORS = ["after", "amid", "ahead of", "despite", "following", "over"]
# Attention-grabbing words that make a title more popular with everyone.
HOOKS = "shocking exclusive revealed stunning surprising incredible secret unbelievable viral heartbreaking".split()
# Markers of a title that brings news on a running story, or that retells it from the start.
UPDATE_MARKERS = ["breaking", "developing", "update", "just in", "new details", "confirmed"]
EXPLAINER_MARKERS = ["explained", "recap", "timeline", "everything to know", "what we know", "the backstory"]
# Topic-free endings of a title ("... ahead of the weekend").
TIME_PHRASES = [
    "this week",
    "this year",
    "today",
    "again",
    "at last",
    "for now",
    "next month",
    "this weekend",
]
