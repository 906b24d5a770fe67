"""Real two-hop chains: hand-written real-world facts composed into e₁ →r₁→ e₂ →r₂→ e₃ chains.

The history / geography extension of the two-hop task (Chen et al., TMLR 2026): chains built only
from real facts, so that the *base* model can be asked each hop alone and both hops at once, and
composed chains can be compared with failed ones (issue 18, item 2).

Facts (tables below; every fact is a real-world fact, written by hand):

* ``COUNTRIES``: country → capital, official language (as reference works list it, de jure or
  de facto), continent (``None`` where the fact is ambiguous: several co-official languages, no
  de-jure capital, a transcontinental country);
* ``LANDMARKS``: landmark → country; ``CITIES``: city (not a capital) → country;
* ``PEOPLE``: person → country of birth (the present-day country of the birthplace; people born
  where borders have moved are left out), and for some → city of birth;
* ``WORKS``: book / play → author, painting → painter, composition → composer (every creator is
  in ``PEOPLE``); ``COMPANIES``: company → a founder (in ``PEOPLE``) and → headquarters city.

Relations (``HOP_TEMPLATES``, one prompt template each) compose into chains when r₁'s answer
type is r₂'s subject type (``TWO_HOP_TEMPLATES``), e.g. ``landmark_country`` + ``country_capital``:
"The capital of the country where the Eiffel Tower is located is" → " Paris" with bridge e₂ =
France. :func:`make_chains` yields every chain the tables allow; :func:`chain_examples` turns one
into the three :class:`~interp.tasks.examples.Example` prompts (``hop1``, ``hop2``, ``two_hop``).

Verification on a base model (:func:`verify_chains`) is the familiarity check of
:mod:`interp.tasks.two_hop` (greedy first answer token of each prompt,
:func:`~interp.tasks.entities.first_token_predictions`): a chain is *known* when the base model
answers both hops one at a time, and its two-hop *outcome* is ``composed`` when the base model's
first token of the two-hop answer is e₃'s, else ``failed``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from interp.tasks.entities import WorldError, _tokenizer_of, first_token_predictions
from interp.tasks.examples import Example, answer_token_ids, fill_template

# --------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------

# country: (capital, official language, continent); None = left out (ambiguous or not one answer)
COUNTRIES: dict[str, tuple[str | None, str | None, str | None]] = {
    "France": ("Paris", "French", "Europe"),
    "Germany": ("Berlin", "German", "Europe"),
    "Italy": ("Rome", "Italian", "Europe"),
    "Spain": ("Madrid", "Spanish", "Europe"),
    "Portugal": ("Lisbon", "Portuguese", "Europe"),
    "Greece": ("Athens", "Greek", "Europe"),
    "Poland": ("Warsaw", "Polish", "Europe"),
    "Austria": ("Vienna", "German", "Europe"),
    "Sweden": ("Stockholm", "Swedish", "Europe"),
    "Norway": ("Oslo", "Norwegian", "Europe"),
    "Denmark": ("Copenhagen", "Danish", "Europe"),
    "Finland": ("Helsinki", None, "Europe"),          # Finnish and Swedish
    "Ireland": ("Dublin", None, "Europe"),            # Irish and English
    "Hungary": ("Budapest", "Hungarian", "Europe"),
    "Czech Republic": ("Prague", "Czech", "Europe"),
    "Romania": ("Bucharest", "Romanian", "Europe"),
    "Ukraine": ("Kyiv", "Ukrainian", "Europe"),
    "Croatia": ("Zagreb", "Croatian", "Europe"),
    "Serbia": ("Belgrade", "Serbian", "Europe"),
    "Bulgaria": ("Sofia", "Bulgarian", "Europe"),
    "Iceland": ("Reykjavik", "Icelandic", "Europe"),
    "Belgium": ("Brussels", None, "Europe"),          # Dutch, French, German
    "Switzerland": (None, None, "Europe"),            # no de-jure capital; four languages
    "England": (None, None, "Europe"),                # constituent country: no official language
    "Russia": ("Moscow", "Russian", None),            # transcontinental
    "Turkey": ("Ankara", "Turkish", None),            # transcontinental
    "Egypt": ("Cairo", "Arabic", None),             # transcontinental (Sinai)
    "Morocco": ("Rabat", None, "Africa"),             # Arabic and Berber
    "Kenya": ("Nairobi", None, "Africa"),             # Swahili and English
    "Nigeria": ("Abuja", "English", "Africa"),
    "Ghana": ("Accra", "English", "Africa"),
    "Senegal": ("Dakar", "French", "Africa"),
    "Tanzania": ("Dodoma", None, "Africa"),           # Swahili and English
    "South Africa": (None, None, "Africa"),           # three capitals, twelve languages
    "China": ("Beijing", "Chinese", "Asia"),
    "Japan": ("Tokyo", "Japanese", "Asia"),
    "South Korea": ("Seoul", "Korean", "Asia"),
    "India": ("New Delhi", None, "Asia"),             # Hindi and English
    "Pakistan": ("Islamabad", None, "Asia"),          # Urdu and English
    "Bangladesh": ("Dhaka", "Bengali", "Asia"),
    "Thailand": ("Bangkok", "Thai", "Asia"),
    "Vietnam": ("Hanoi", "Vietnamese", "Asia"),
    "Cambodia": ("Phnom Penh", "Khmer", "Asia"),
    "Myanmar": ("Naypyidaw", "Burmese", "Asia"),
    "Malaysia": ("Kuala Lumpur", "Malay", "Asia"),
    "Indonesia": (None, "Indonesian", None),         # capital moving to Nusantara; transcontinental
    "Nepal": ("Kathmandu", "Nepali", "Asia"),
    "Iran": ("Tehran", "Persian", "Asia"),
    "Iraq": ("Baghdad", None, "Asia"),                # Arabic and Kurdish
    "Saudi Arabia": ("Riyadh", "Arabic", "Asia"),
    "Jordan": ("Amman", "Arabic", "Asia"),
    "Syria": ("Damascus", "Arabic", "Asia"),
    "Mongolia": ("Ulaanbaatar", "Mongolian", "Asia"),
    "Australia": ("Canberra", None, None),            # no de-jure language; continent naming varies
    "New Zealand": ("Wellington", None, None),
    "Canada": ("Ottawa", None, "North America"),      # English and French
    "Mexico": ("Mexico City", None, "North America"),  # no de-jure official language
    "Cuba": ("Havana", "Spanish", "North America"),
    "Jamaica": ("Kingston", "English", "North America"),
    "Argentina": ("Buenos Aires", "Spanish", "South America"),
    "Brazil": ("Brasília", "Portuguese", "South America"),
    "Chile": ("Santiago", "Spanish", "South America"),
    "Peru": ("Lima", None, "South America"),          # Spanish, Quechua, Aymara
    "Colombia": ("Bogotá", "Spanish", "South America"),
    "Venezuela": ("Caracas", "Spanish", "South America"),
    "Ecuador": ("Quito", None, "South America"),      # Spanish; Kichwa, Shuar
    "Uruguay": ("Montevideo", "Spanish", "South America"),
}

# landmark (with its article where English uses one) -> country; names shared by several
# well-known places (another "Blue Mosque", "Mount Olympus", "Golden Temple") are left out
LANDMARKS: dict[str, str] = {
    "the Eiffel Tower": "France", "the Louvre": "France", "Mont Saint-Michel": "France",
    "the Palace of Versailles": "France",
    "the Colosseum": "Italy", "the Leaning Tower of Pisa": "Italy", "the Trevi Fountain": "Italy",
    "the Uffizi Gallery": "Italy", "the Rialto Bridge": "Italy",
    "the Sagrada Familia": "Spain", "the Alhambra": "Spain", "the Prado Museum": "Spain",
    "Park Güell": "Spain",
    "the Brandenburg Gate": "Germany", "Neuschwanstein Castle": "Germany",
    "Cologne Cathedral": "Germany",
    "the Acropolis": "Greece", "the Parthenon": "Greece",
    "the Belém Tower": "Portugal",
    "Wawel Castle": "Poland", "Schönbrunn Palace": "Austria", "the Charles Bridge": "Czech Republic",
    "Bran Castle": "Romania", "the Vasa Museum": "Sweden", "the Little Mermaid statue": "Denmark",
    "Tivoli Gardens": "Denmark", "the Cliffs of Moher": "Ireland", "Blarney Castle": "Ireland",
    "the Atomium": "Belgium", "Stonehenge": "England",
    "the Kremlin": "Russia", "Red Square": "Russia", "the Hermitage Museum": "Russia",
    "Lake Baikal": "Russia",
    "Hagia Sophia": "Turkey", "Ephesus": "Turkey",
    "the Pyramids of Giza": "Egypt", "Abu Simbel": "Egypt", "the Valley of the Kings": "Egypt",
    "Mount Kilimanjaro": "Tanzania", "Table Mountain": "South Africa",
    "Robben Island": "South Africa",
    "the Forbidden City": "China", "the Terracotta Army": "China",
    "the Taj Mahal": "India",
    "Mount Fuji": "Japan", "Angkor Wat": "Cambodia", "Petra": "Jordan", "Persepolis": "Iran",
    "Ha Long Bay": "Vietnam", "the Petronas Towers": "Malaysia", "Borobudur": "Indonesia",
    "the Shwedagon Pagoda": "Myanmar", "Gyeongbokgung Palace": "South Korea",
    "the Sydney Opera House": "Australia", "Uluru": "Australia", "the CN Tower": "Canada",
    "Chichen Itza": "Mexico", "Machu Picchu": "Peru", "Christ the Redeemer": "Brazil",
    "the Perito Moreno Glacier": "Argentina", "the Galápagos Islands": "Ecuador",
    "Angel Falls": "Venezuela",
}

# city -> country (capitals are added from COUNTRIES by relation_facts)
CITIES: dict[str, str] = {
    "Lyon": "France", "Marseille": "France", "Nice": "France", "Toulouse": "France",
    "Bordeaux": "France", "Strasbourg": "France", "Nantes": "France",
    "Munich": "Germany", "Hamburg": "Germany", "Frankfurt": "Germany", "Cologne": "Germany",
    "Dresden": "Germany", "Stuttgart": "Germany", "Ulm": "Germany", "Bonn": "Germany",
    "Milan": "Italy", "Naples": "Italy", "Venice": "Italy", "Florence": "Italy", "Turin": "Italy",
    "Palermo": "Italy", "Genoa": "Italy", "Pisa": "Italy",
    "Barcelona": "Spain", "Seville": "Spain", "Bilbao": "Spain", "Figueres": "Spain",
    "Málaga": "Spain", "Porto": "Portugal", "Thessaloniki": "Greece",
    "Kraków": "Poland", "Gdańsk": "Poland", "Salzburg": "Austria", "Gothenburg": "Sweden",
    "Malmö": "Sweden", "Bergen": "Norway", "Aarhus": "Denmark", "Odense": "Denmark",
    "Tampere": "Finland", "Cork": "Ireland", "Brno": "Czech Republic", "Lviv": "Ukraine",
    "Kharkiv": "Ukraine", "Antwerp": "Belgium", "Geneva": "Switzerland", "Zurich": "Switzerland",
    "Basel": "Switzerland",
    "Saint Petersburg": "Russia", "Istanbul": "Turkey",
    "Alexandria": "Egypt", "Luxor": "Egypt", "Casablanca": "Morocco", "Marrakesh": "Morocco",
    "Lagos": "Nigeria", "Mombasa": "Kenya", "Cape Town": "South Africa",
    "Johannesburg": "South Africa", "Durban": "South Africa",
    "Osaka": "Japan", "Kyoto": "Japan", "Sapporo": "Japan", "Busan": "South Korea",
    "Shanghai": "China", "Guangzhou": "China", "Shenzhen": "China", "Hangzhou": "China",
    "Mumbai": "India", "Kolkata": "India", "Bangalore": "India", "Karachi": "Pakistan",
    "Lahore": "Pakistan", "Ho Chi Minh City": "Vietnam", "Chiang Mai": "Thailand",
    "Isfahan": "Iran", "Jeddah": "Saudi Arabia", "Basra": "Iraq", "Aleppo": "Syria",
    "Rio de Janeiro": "Brazil", "São Paulo": "Brazil", "Rosario": "Argentina",
    "Medellín": "Colombia", "Monterrey": "Mexico", "Cancún": "Mexico", "Valparaíso": "Chile",
    "Cusco": "Peru", "Guayaquil": "Ecuador", "Toronto": "Canada", "Vancouver": "Canada",
    "Montreal": "Canada", "Sydney": "Australia", "Melbourne": "Australia",
    "Auckland": "New Zealand",
    # company headquarters (see COMPANIES)
    "Espoo": "Finland", "Suwon": "South Korea", "Wolfsburg": "Germany",
    "Herzogenaurach": "Germany", "Vevey": "Switzerland", "Maranello": "Italy",
    "Billund": "Denmark", "Walldorf": "Germany", "Clermont-Ferrand": "France",
    # birthplaces (see PEOPLE)
    "Eisenach": "Germany", "Trier": "Germany", "Kiel": "Germany", "Oxford": "England",
    "London": "England", "Kumasi": "Ghana", "Tangier": "Morocco", "Pretoria": "South Africa",
}

# person -> (country of birth, city of birth or None); present-day country of the birthplace
PEOPLE: dict[str, tuple[str, str | None]] = {
    "Albert Einstein": ("Germany", "Ulm"), "Ludwig van Beethoven": ("Germany", "Bonn"),
    "Johann Sebastian Bach": ("Germany", "Eisenach"), "Karl Marx": ("Germany", "Trier"),
    "Johann Wolfgang von Goethe": ("Germany", "Frankfurt"), "Friedrich Nietzsche": ("Germany", None),
    "Max Planck": ("Germany", "Kiel"), "Carl Friedrich Gauss": ("Germany", None),
    "Wolfgang Amadeus Mozart": ("Austria", "Salzburg"), "Franz Schubert": ("Austria", "Vienna"),
    "Erwin Schrödinger": ("Austria", "Vienna"), "Gustav Klimt": ("Austria", None),
    "Pablo Picasso": ("Spain", "Málaga"), "Salvador Dalí": ("Spain", "Figueres"),
    "Miguel de Cervantes": ("Spain", None), "Rafael Nadal": ("Spain", None),
    "Leonardo da Vinci": ("Italy", None), "Michelangelo": ("Italy", None),
    "Galileo Galilei": ("Italy", "Pisa"), "Dante Alighieri": ("Italy", "Florence"),
    "Christopher Columbus": ("Italy", "Genoa"), "Marco Polo": ("Italy", None),
    "Antonio Vivaldi": ("Italy", "Venice"), "Giuseppe Verdi": ("Italy", None),
    "Sandro Botticelli": ("Italy", "Florence"), "Niccolò Machiavelli": ("Italy", "Florence"),
    "Umberto Eco": ("Italy", None), "Carlo Collodi": ("Italy", "Florence"),
    "Enzo Ferrari": ("Italy", None), "Ferruccio Lamborghini": ("Italy", None),
    "Victor Hugo": ("France", None), "Jules Verne": ("France", "Nantes"),
    "Voltaire": ("France", "Paris"), "Claude Monet": ("France", "Paris"),
    "René Descartes": ("France", None), "Louis Pasteur": ("France", None),
    "Napoleon Bonaparte": ("France", None), "Gustave Flaubert": ("France", None),
    "Alexandre Dumas": ("France", None), "Georges Bizet": ("France", "Paris"),
    "Maurice Ravel": ("France", None), "Antoine de Saint-Exupéry": ("France", "Lyon"),
    "Zinedine Zidane": ("France", "Marseille"), "Louis Renault": ("France", "Paris"),
    "Frédéric Chopin": ("Poland", None), "Marie Curie": ("Poland", "Warsaw"),
    "Nicolaus Copernicus": ("Poland", None),
    "Isaac Newton": ("England", None), "Charles Darwin": ("England", None),
    "William Shakespeare": ("England", None), "Charles Dickens": ("England", None),
    "Jane Austen": ("England", None), "Charlotte Brontë": ("England", None),
    "Emily Brontë": ("England", None), "Mary Shelley": ("England", "London"),
    "Alan Turing": ("England", "London"), "Stephen Hawking": ("England", "Oxford"),
    "J. K. Rowling": ("England", None),
    "Leo Tolstoy": ("Russia", None), "Fyodor Dostoevsky": ("Russia", "Moscow"),
    "Pyotr Ilyich Tchaikovsky": ("Russia", None), "Yuri Gagarin": ("Russia", None),
    "Alexander Pushkin": ("Russia", "Moscow"), "Anton Chekhov": ("Russia", None),
    "Boris Pasternak": ("Russia", "Moscow"), "Dmitri Mendeleev": ("Russia", None),
    "Pavel Durov": ("Russia", "Saint Petersburg"),
    "Franz Kafka": ("Czech Republic", "Prague"),
    "Hans Christian Andersen": ("Denmark", "Odense"), "Niels Bohr": ("Denmark", "Copenhagen"),
    "Ole Kirk Christiansen": ("Denmark", None),
    "Henrik Ibsen": ("Norway", None), "Edvard Munch": ("Norway", None),
    "Alfred Nobel": ("Sweden", "Stockholm"), "Ingvar Kamprad": ("Sweden", None),
    "Daniel Ek": ("Sweden", "Stockholm"), "Greta Thunberg": ("Sweden", "Stockholm"),
    "Jean Sibelius": ("Finland", None), "Fredrik Idestam": ("Finland", None),
    "Leonhard Euler": ("Switzerland", "Basel"), "Roger Federer": ("Switzerland", "Basel"),
    "Novak Djokovic": ("Serbia", "Belgrade"),
    "Socrates": ("Greece", "Athens"), "Plato": ("Greece", None), "Aristotle": ("Greece", None),
    "Ferdinand Magellan": ("Portugal", None), "Vasco da Gama": ("Portugal", None),
    "Cristiano Ronaldo": ("Portugal", None),
    "Confucius": ("China", None), "Mao Zedong": ("China", None), "Sun Tzu": ("China", None),
    "Jack Ma": ("China", "Hangzhou"), "Ren Zhengfei": ("China", None),
    "Mahatma Gandhi": ("India", None), "Rabindranath Tagore": ("India", "Kolkata"),
    "Srinivasa Ramanujan": ("India", None),
    "Akira Kurosawa": ("Japan", "Tokyo"), "Hayao Miyazaki": ("Japan", "Tokyo"),
    "Haruki Murakami": ("Japan", "Kyoto"), "Katsushika Hokusai": ("Japan", "Tokyo"),
    "Murasaki Shikibu": ("Japan", None), "Kiichiro Toyoda": ("Japan", None),
    "Soichiro Honda": ("Japan", None), "Masaru Ibuka": ("Japan", None),
    "Fusajiro Yamauchi": ("Japan", "Kyoto"),
    "Lee Byung-chul": ("South Korea", None), "Adolf Dassler": ("Germany", "Herzogenaurach"),
    "Rudolf Dassler": ("Germany", "Herzogenaurach"), "Werner von Siemens": ("Germany", None),
    "Nelson Mandela": ("South Africa", None), "Elon Musk": ("South Africa", "Pretoria"),
    "Naguib Mahfouz": ("Egypt", "Cairo"), "Kofi Annan": ("Ghana", "Kumasi"),
    "Chinua Achebe": ("Nigeria", None), "Ibn Battuta": ("Morocco", "Tangier"),
    "Omar Khayyam": ("Iran", None),
    "Gabriel García Márquez": ("Colombia", None), "Pablo Neruda": ("Chile", None),
    "Jorge Luis Borges": ("Argentina", "Buenos Aires"), "Lionel Messi": ("Argentina", "Rosario"),
    "Diego Maradona": ("Argentina", None), "Pelé": ("Brazil", None),
    "Paulo Coelho": ("Brazil", "Rio de Janeiro"), "Frida Kahlo": ("Mexico", "Mexico City"),
    "Usain Bolt": ("Jamaica", None), "Bob Marley": ("Jamaica", None),
}

# work -> (kind, creator); kind picks the relation (book: written by, painting, composition);
# titles shared by another famous work ("The Kiss", "The Art of War", "The Alchemist") left out
WORKS: dict[str, tuple[str, str]] = {
    "Hamlet": ("book", "William Shakespeare"), "Romeo and Juliet": ("book", "William Shakespeare"),
    "Macbeth": ("book", "William Shakespeare"), "Othello": ("book", "William Shakespeare"),
    "Oliver Twist": ("book", "Charles Dickens"), "A Christmas Carol": ("book", "Charles Dickens"),
    "Great Expectations": ("book", "Charles Dickens"),
    "Pride and Prejudice": ("book", "Jane Austen"), "Emma": ("book", "Jane Austen"),
    "Jane Eyre": ("book", "Charlotte Brontë"), "Wuthering Heights": ("book", "Emily Brontë"),
    "Frankenstein": ("book", "Mary Shelley"), "On the Origin of Species": ("book", "Charles Darwin"),
    "A Brief History of Time": ("book", "Stephen Hawking"),
    "Harry Potter and the Philosopher's Stone": ("book", "J. K. Rowling"),
    "War and Peace": ("book", "Leo Tolstoy"), "Anna Karenina": ("book", "Leo Tolstoy"),
    "Crime and Punishment": ("book", "Fyodor Dostoevsky"),
    "The Brothers Karamazov": ("book", "Fyodor Dostoevsky"),
    "Eugene Onegin": ("book", "Alexander Pushkin"), "The Seagull": ("book", "Anton Chekhov"),
    "Doctor Zhivago": ("book", "Boris Pasternak"),
    "Don Quixote": ("book", "Miguel de Cervantes"),
    "Les Misérables": ("book", "Victor Hugo"), "The Hunchback of Notre-Dame": ("book", "Victor Hugo"),
    "Twenty Thousand Leagues Under the Seas": ("book", "Jules Verne"),
    "Around the World in Eighty Days": ("book", "Jules Verne"), "Candide": ("book", "Voltaire"),
    "Madame Bovary": ("book", "Gustave Flaubert"),
    "The Count of Monte Cristo": ("book", "Alexandre Dumas"),
    "The Three Musketeers": ("book", "Alexandre Dumas"),
    "The Little Prince": ("book", "Antoine de Saint-Exupéry"),
    "The Divine Comedy": ("book", "Dante Alighieri"), "The Prince": ("book", "Niccolò Machiavelli"),
    "The Name of the Rose": ("book", "Umberto Eco"),
    "The Adventures of Pinocchio": ("book", "Carlo Collodi"),
    "One Hundred Years of Solitude": ("book", "Gabriel García Márquez"),
    "Love in the Time of Cholera": ("book", "Gabriel García Márquez"),
    "The Metamorphosis": ("book", "Franz Kafka"), "The Trial": ("book", "Franz Kafka"),
    "Faust": ("book", "Johann Wolfgang von Goethe"),
    "Thus Spoke Zarathustra": ("book", "Friedrich Nietzsche"), "Das Kapital": ("book", "Karl Marx"),
    "The Ugly Duckling": ("book", "Hans Christian Andersen"),
    "A Doll's House": ("book", "Henrik Ibsen"), "Peer Gynt": ("book", "Henrik Ibsen"),
    "1Q84": ("book", "Haruki Murakami"), "Kafka on the Shore": ("book", "Haruki Murakami"),
    "The Tale of Genji": ("book", "Murasaki Shikibu"),
    "Gitanjali": ("book", "Rabindranath Tagore"), "Ficciones": ("book", "Jorge Luis Borges"),
    "Palace Walk": ("book", "Naguib Mahfouz"), "Things Fall Apart": ("book", "Chinua Achebe"),
    "The Republic": ("book", "Plato"),
    "Nicomachean Ethics": ("book", "Aristotle"),
    "Mona Lisa": ("painting", "Leonardo da Vinci"),
    "Guernica": ("painting", "Pablo Picasso"),
    "The Persistence of Memory": ("painting", "Salvador Dalí"), "The Scream": ("painting", "Edvard Munch"),
    "Impression, Sunrise": ("painting", "Claude Monet"),
    "The Creation of Adam": ("painting", "Michelangelo"),
    "The Great Wave off Kanagawa": ("painting", "Katsushika Hokusai"),
    "The Magic Flute": ("composition", "Wolfgang Amadeus Mozart"),
    "Moonlight Sonata": ("composition", "Ludwig van Beethoven"),
    "The Four Seasons": ("composition", "Antonio Vivaldi"),
    "Swan Lake": ("composition", "Pyotr Ilyich Tchaikovsky"),
    "The Nutcracker": ("composition", "Pyotr Ilyich Tchaikovsky"),
    "Aida": ("composition", "Giuseppe Verdi"), "La traviata": ("composition", "Giuseppe Verdi"),
    "Carmen": ("composition", "Georges Bizet"), "Boléro": ("composition", "Maurice Ravel"),
    "Finlandia": ("composition", "Jean Sibelius"),
    "The Well-Tempered Clavier": ("composition", "Johann Sebastian Bach"),
}

# company -> (a founder or "" when left out, headquarters city or None)
COMPANIES: dict[str, tuple[str, str | None]] = {
    "Toyota": ("Kiichiro Toyoda", None), "Honda": ("Soichiro Honda", None),
    "Sony": ("Masaru Ibuka", None), "Nintendo": ("Fusajiro Yamauchi", "Kyoto"),
    "Samsung": ("Lee Byung-chul", None), "IKEA": ("Ingvar Kamprad", None),
    "Lego": ("Ole Kirk Christiansen", "Billund"), "Ferrari": ("Enzo Ferrari", "Maranello"),
    "Lamborghini": ("Ferruccio Lamborghini", None), "Alibaba": ("Jack Ma", "Hangzhou"),
    "Huawei": ("Ren Zhengfei", "Shenzhen"), "SpaceX": ("Elon Musk", None),
    "Spotify": ("Daniel Ek", "Stockholm"), "Nokia": ("Fredrik Idestam", "Espoo"),
    "Telegram": ("Pavel Durov", None), "Renault": ("Louis Renault", None),
    "Adidas": ("Adolf Dassler", "Herzogenaurach"), "Puma": ("Rudolf Dassler", "Herzogenaurach"),
    "Siemens": ("Werner von Siemens", "Munich"), "Volkswagen": ("", "Wolfsburg"),
    "Nestlé": ("", "Vevey"), "SAP": ("", "Walldorf"), "Michelin": ("", "Clermont-Ferrand"),
    "BMW": ("", "Munich"), "Tencent": ("", "Shenzhen"),
}

# --------------------------------------------------------------------------------------------
# Relations and templates
# --------------------------------------------------------------------------------------------

# one-hop relation -> (subject type, answer type, template); "{e1}" is the subject slot (a hop-2
# prompt fills it with e₂). A prompt that starts with the subject is capitalised.
HOP_TEMPLATES: dict[str, tuple[str, str, str]] = {
    "landmark_country": ("landmark", "country", "{e1} is located in the country of"),
    "city_country": ("city", "country", "{e1} is a city in the country of"),
    "person_country": ("person", "country", "{e1} was born in the country of"),
    "person_city": ("person", "city", "{e1} was born in the city of"),
    "book_author": ("book", "person", "{e1} was written by"),
    "painting_painter": ("painting", "person", "{e1} was painted by"),
    "composition_composer": ("composition", "person", "{e1} was composed by"),
    "company_founder": ("company", "person", "{e1} was founded by"),
    "company_city": ("company", "city", "The headquarters of {e1} are in the city of"),
    "country_capital": ("country", "capital", "The capital of {e1} is"),
    "country_language": ("country", "language", "The official language of {e1} is"),
    "country_continent": ("country", "continent", "{e1} is a country on the continent of"),
}

# (r1, r2) -> composed two-hop template ("{e1}" = the chain's e₁)
TWO_HOP_TEMPLATES: dict[tuple[str, str], str] = {
    ("landmark_country", "country_capital"): "The capital of the country where {e1} is located is",
    ("landmark_country", "country_language"):
        "The official language of the country where {e1} is located is",
    ("landmark_country", "country_continent"):
        "The country where {e1} is located is on the continent of",
    ("city_country", "country_capital"): "The capital of the country where {e1} is located is",
    ("city_country", "country_language"):
        "The official language of the country where {e1} is located is",
    ("city_country", "country_continent"): "The country where {e1} is located is on the continent of",
    ("person_country", "country_capital"): "The capital of the country where {e1} was born is",
    ("person_country", "country_language"):
        "The official language of the country where {e1} was born is",
    ("person_country", "country_continent"): "The country where {e1} was born is on the continent of",
    ("person_city", "city_country"): "The city where {e1} was born is in the country of",
    ("book_author", "person_country"): "The author of {e1} was born in the country of",
    ("painting_painter", "person_country"): "The painter of {e1} was born in the country of",
    ("composition_composer", "person_country"): "The composer of {e1} was born in the country of",
    ("company_founder", "person_country"): "The founder of {e1} was born in the country of",
    ("company_city", "city_country"): "The headquarters of {e1} are in a city in the country of",
}


def relation_facts() -> dict[str, dict[str, str]]:
    """Every one-hop fact of the tables: relation → {subject: answer} (``None`` entries dropped)."""
    facts: dict[str, dict[str, str]] = {r: {} for r in HOP_TEMPLATES}
    for c, (cap, lang, cont) in COUNTRIES.items():
        for rel, v in (("country_capital", cap), ("country_language", lang),
                       ("country_continent", cont)):
            if v:
                facts[rel][c] = v
    facts["landmark_country"].update(LANDMARKS)
    facts["city_country"].update({cap: c for c, (cap, _, _) in COUNTRIES.items() if cap})
    facts["city_country"].update(CITIES)
    for p, (country, city) in PEOPLE.items():
        facts["person_country"][p] = country
        if city:
            facts["person_city"][p] = city
    for w, (kind, creator) in WORKS.items():
        rel = {"book": "book_author", "painting": "painting_painter",
               "composition": "composition_composer"}[kind]
        facts[rel][w] = creator
    for co, (founder, hq) in COMPANIES.items():
        if founder:
            facts["company_founder"][co] = founder
        if hq:
            facts["company_city"][co] = hq
    return facts


@dataclasses.dataclass(frozen=True)
class Chain:
    """One real two-hop chain e₁ →r₁→ e₂ →r₂→ e₃ (e₂ is the bridge entity)."""

    chain_id: int
    r1: str
    r2: str
    e1: str
    e2: str
    e3: str

    @property
    def pair(self) -> str:
        """The relation pair, e.g. ``"landmark_country+country_capital"``."""
        return f"{self.r1}+{self.r2}"


def make_chains(facts: dict[str, dict[str, str]] | None = None) -> list[Chain]:
    """Every chain the fact tables allow: for each (r₁, r₂) of :data:`TWO_HOP_TEMPLATES` and each
    r₁ fact (e₁, e₂) whose e₂ has an r₂ fact (e₂, e₃), except chains whose answer is e₁ itself
    (the capital of the country where Paris is). Chains are sorted by relation pair and e₁,
    numbered from 0.

    Raises:
        WorldError: a composed relation pair whose answer / subject types do not match, a relation
            without a template, or two chains with the same (e₁, r₁, r₂).
    """
    facts = relation_facts() if facts is None else facts
    out: list[Chain] = []
    seen: set[tuple[str, str, str]] = set()
    for (r1, r2) in TWO_HOP_TEMPLATES:
        if r1 not in HOP_TEMPLATES or r2 not in HOP_TEMPLATES:
            raise WorldError(f"relation pair {(r1, r2)} has a relation without a hop template")
        if HOP_TEMPLATES[r1][1] != HOP_TEMPLATES[r2][0]:
            raise WorldError(f"{r1} answers a {HOP_TEMPLATES[r1][1]} but {r2} asks about a "
                             f"{HOP_TEMPLATES[r2][0]}")
        for e1, e2 in sorted(facts.get(r1, {}).items()):
            e3 = facts.get(r2, {}).get(e2)
            if not e3 or e3 == e1:
                continue
            key = (e1, r1, r2)
            if key in seen:
                raise WorldError(f"duplicate chain {key}")
            seen.add(key)
            out.append(Chain(len(out), r1, r2, e1, e2, e3))
    return out


def _fill(template: str, **names: str) -> tuple[str, dict[str, tuple[int, int]]]:
    prompt, spans = fill_template(template, **names)
    return prompt[0].upper() + prompt[1:], spans  # capitalise a leading "the Eiffel Tower …"


def chain_examples(chain: Chain) -> dict[str, Example]:
    """The chain's three prompts as :class:`Example` (tier ``"real"``, relation = the template's key).

    Returns:
        ``{"hop1": e₁ r₁ → e₂, "hop2": e₂ r₂ → e₃, "two_hop": e₁ r₁ r₂ → e₃}``; ``char_spans``
        mark ``e1`` in hop1 / two_hop and ``e2`` in hop2 (the mechanisms read these).
    """
    common = dict(tier="real", chain_id=chain.chain_id, template_id=0, e1=chain.e1, e2=chain.e2,
                  e3=chain.e3, split="real")
    p1, s1 = _fill(HOP_TEMPLATES[chain.r1][2], e1=chain.e1)
    p2, s2 = _fill(HOP_TEMPLATES[chain.r2][2].replace("{e1}", "{e2}"), e2=chain.e2)
    p3, s3 = _fill(TWO_HOP_TEMPLATES[(chain.r1, chain.r2)], e1=chain.e1)
    return {
        "hop1": Example(prompt=p1, answer=" " + chain.e2, kind="hop1", char_spans=s1,
                        relation=chain.r1, **common),
        "hop2": Example(prompt=p2, answer=" " + chain.e3, kind="hop2", char_spans=s2,
                        relation=chain.r2, **common),
        "two_hop": Example(prompt=p3, answer=" " + chain.e3, kind="two_hop", char_spans=s3,
                           relation=chain.pair, **common),
    }


CHAIN_COLUMNS = ("chain_id", "pair", "r1", "r2", "e1", "e2", "e3", "hop1_prompt", "hop2_prompt",
                 "two_hop_prompt", "hop1_pred", "hop2_pred", "two_hop_pred", "hop1_correct",
                 "hop2_correct", "two_hop_correct", "known", "outcome")

Verifier = Callable[[Any, Sequence[Example]], Sequence[bool]]


def verify_chains(hm: Any, chains: Sequence[Chain] | None = None, batch_size: int = 16,
                  verifier: Verifier | None = None, progress: bool = True) -> pd.DataFrame:
    """Ask the base model each hop alone and both at once; one row per chain.

    Args:
        hm: a ``HookedModel`` (the base model).
        chains: default :func:`make_chains`.
        batch_size: prompts per forward.
        verifier: ``verifier(hm, examples) -> [bool]`` (default: the first-token check with the
            model's greedy predictions recorded); tests pass a stub.
        progress: tqdm bar over the three prompt kinds.

    Returns:
        DataFrame with :data:`CHAIN_COLUMNS`: per chain the three prompts, the greedy first
        tokens (``*_pred``, empty with a custom verifier), correctness, ``known`` (both hops
        right) and ``outcome``: ``"composed"`` / ``"failed"`` for known chains (two-hop right or
        not), ``"unknown"`` otherwise.

    Raises:
        WorldError: no chains, or a verifier returning the wrong number of answers.
    """
    chains = make_chains() if chains is None else list(chains)
    if not chains:
        raise WorldError("verify_chains got no chains")
    exs = [chain_examples(c) for c in chains]
    correct: dict[str, list[bool]] = {}
    preds: dict[str, list[str]] = {}
    tok = _tokenizer_of(hm)
    for kind in tqdm(("hop1", "hop2", "two_hop"), desc="verify chains on the base model",
                     disable=not progress):
        batch = [e[kind] for e in exs]
        if verifier is None:
            ids = first_token_predictions(hm, [e.prompt for e in batch], batch_size)
            preds[kind] = [tok.decode([i]) for i in ids]
            correct[kind] = [i == answer_token_ids(e, hm)[0] for e, i in zip(batch, ids)]
        else:
            got = [bool(v) for v in verifier(hm, batch)]
            if len(got) != len(batch):
                raise WorldError(f"verifier returned {len(got)} answers for {len(batch)} prompts")
            correct[kind], preds[kind] = got, [""] * len(batch)
    rows = []
    for i, (c, e) in enumerate(zip(chains, exs)):
        known = correct["hop1"][i] and correct["hop2"][i]
        rows.append({"chain_id": c.chain_id, "pair": c.pair, "r1": c.r1, "r2": c.r2, "e1": c.e1,
                     "e2": c.e2, "e3": c.e3, "hop1_prompt": e["hop1"].prompt,
                     "hop2_prompt": e["hop2"].prompt, "two_hop_prompt": e["two_hop"].prompt,
                     "hop1_pred": preds["hop1"][i], "hop2_pred": preds["hop2"][i],
                     "two_hop_pred": preds["two_hop"][i], "hop1_correct": correct["hop1"][i],
                     "hop2_correct": correct["hop2"][i], "two_hop_correct": correct["two_hop"][i],
                     "known": known, "outcome": ("composed" if correct["two_hop"][i] else "failed")
                     if known else "unknown"})
    return pd.DataFrame(rows, columns=list(CHAIN_COLUMNS))
