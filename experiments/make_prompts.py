"""Writes configs/prompts/instruct_train.txt: user turns for the trunk to answer when it writes the
heads' training data (data.self_prompts). Each kind of request below (questions, explanations,
advice, lists, letters, recipes, stories, poems, names, comparisons) is applied to its own
subjects. Every combination of the smaller kinds is kept, and questions about things fill the
file to COUNT lines, all in a fixed shuffled order, so that the chats a recipe samples cover many
subjects and forms. None of them is, or is about the subject of, a
held-out bench prompt (configs/prompts/instruct_heldout.txt); the script checks that no line
repeats one.

Run: python experiments/make_prompts.py
"""

import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402

from mtp_jax import atomic, cli  # noqa: E402
COUNT = 6000

THINGS = [
    'volcanoes', 'black holes', 'the Roman Empire', 'honey bees', 'the printing press',
    'solar panels', 'the human heart', 'jazz music', 'origami', 'the Great Wall of China',
    'electric cars', 'rainforests', 'the Olympic Games', 'coral reefs', 'the internet',
    'meditation', 'dinosaurs', 'the moon landing', 'earthquakes', 'penguins', 'the stock market',
    'bread baking', 'the piano', 'glaciers', 'friendship', 'the Renaissance', 'wind turbines',
    'migratory birds', 'chocolate', 'public libraries', 'the solar system',
    'bonsai trees', 'ancient Greece', 'drones', 'the Amazon river', 'tea', 'the telephone',
    'deserts', 'yoga', 'the Industrial Revolution', 'sharks', 'video games', 'the periodic table',
    'democracy', 'lighthouses', 'the French Revolution', 'cheese making', 'umbrellas', 'the violin',
    'space telescopes', 'kindness', 'trains', 'rivers', 'social media', 'the Vikings',
    'photography', 'dolphins', 'the human skeleton', 'castles', 'the ocean tides', 'electricity',
    'knitting', 'elephants', 'the wheel', 'airplanes', 'spiders', 'the calendar', 'museums',
    'owls', 'board games', 'the Maya civilization', 'soccer', 'hurricanes', 'maps', 'the alphabet',
    'the Silk Road', 'city parks', 'teamwork', 'snow', 'the microscope', 'whales', 'rockets',
    'the Arctic', 'bridges', 'handwriting', 'the rainbow', 'wolves', 'books', 'hibernation',
    'the compass', 'music festivals', 'marathons', 'magnets', 'bats', 'farming', 'languages',
    'the theater', 'thunderstorms', 'the Mars rovers', 'sign language', 'pirates', 'coins',
    'clocks', 'the human eye', 'batteries', 'earthworms', 'the Byzantine Empire', 'submarines',
    'fireworks', 'the stethoscope', 'salt', 'sunflowers', 'the Mongol Empire', 'comets', 'frogs',
    'the Eiffel Tower', 'skyscrapers', 'newspapers', 'the postal service', 'ants', 'tornadoes',
    'the Internet of Things', 'cloud computing', 'artificial intelligence', 'blockchains',
    'passwords', 'spreadsheets', 'email', 'search engines', '3D printing', 'quantum computers',
    'the human genome', 'the nervous system', 'blood types', 'sugar', 'bananas',
    'potatoes', 'rice farming', 'olive oil', 'spices', 'fermentation', 'ice cream', 'pizza',
    'the banjo', 'opera', 'hip hop', 'classical ballet', 'street art', 'comic books', 'poetry',
    'sculpture', 'the camera obscura', 'silent films', 'architecture', 'gardening', 'compost',
    'butterflies', 'octopuses', 'horses', 'parrots', 'camels', 'tigers', 'kangaroos', 'jellyfish',
    'redwood trees', 'mushrooms', 'cacti', 'wetlands', 'caves', 'islands', 'lakes', 'waterfalls',
    'the northern lights', 'eclipses', 'the Milky Way', 'Jupiter', 'Saturn\'s rings', 'meteors',
    'satellites', 'the International Space Station', 'nuclear power', 'hydropower', 'steam engines',
    'the light bulb', 'refrigerators', 'the radio', 'television', 'vinyl records', 'typewriters',
    'the bicycle bell', 'highways', 'subways', 'ships', 'canals', 'hot air balloons', 'helicopters',
    'the Roman aqueducts', 'the Aztecs', 'the Inca road system', 'samurai', 'knights', 'the Titanic',
    'the Cold War', 'the Berlin Wall', 'the printing of money', 'taxes', 'inflation', 'banks',
    'credit cards', 'small businesses', 'advertising', 'supply chains', 'elections', 'courts',
    'human rights', 'the United Nations', 'volunteering', 'neighbors', 'grandparents', 'siblings',
    'pets', 'birthdays', 'holidays', 'weddings', 'school uniforms', 'homework', 'exams',
    'universities', 'online courses', 'libraries of the ancient world', 'philosophy', 'logic',
    'prime numbers', 'fractions', 'geometry', 'probability', 'statistics', 'infinity', 'zero',
    'algorithms', 'databases', 'robots in factories', 'self-driving cars', 'virtual reality',
    'smartphones', 'headphones', 'keyboards', 'sound waves', 'light', 'rust', 'glass', 'paper',
    'cotton', 'wool', 'leather', 'steel', 'concrete', 'wood',
]

ACTIVITIES = [
    'learning to swim', 'saving money', 'learning a new language', 'running a first 5k',
    'studying for an exam', 'starting a vegetable garden', 'keeping a journal', 'learning guitar',
    'cooking for a large family', 'moving to a new city', 'working from home', 'writing a novel',
    'taking better photos', 'painting with watercolors', 'organizing a closet', 'making new friends',
    'staying focused while studying', 'learning to code', 'training a puppy', 'caring for a cat',
    'planning a birthday party', 'traveling on a budget', 'learning to draw', 'reading more books',
    'staying calm before a test', 'building a bookshelf', 'fixing a flat tire', 'baking cookies',
    'keeping houseplants alive', 'starting a small business', 'learning to dance',
    'teaching a child to read', 'cleaning the kitchen quickly', 'writing a good essay',
    'managing time at work', 'learning to juggle', 'preparing for a long flight',
    'making a podcast', 'decorating a small apartment',
    'recycling electronics', 'saving energy at home', 'walking more every day',
    'learning to knit', 'giving constructive feedback', 'taking notes in class',
    'writing a thank-you letter', 'choosing a good book', 'learning to ski', 'hosting a dinner',
]

# Subjects for the kinds of request that need their own: dishes, letters, things to name, scenes.
DISHES = ['pancakes', 'a vegetable curry', 'banana bread', 'a green salad', 'fried rice',
          'lemonade', 'a fruit smoothie', 'guacamole', 'scrambled eggs', 'a bean chili',
          'oatmeal cookies', 'a simple pasta sauce', 'roasted vegetables', 'hummus',
          'a chicken sandwich', 'apple pie', 'mashed potatoes', 'a lentil stew', 'garlic bread',
          'rice pudding']
LETTERS = ['thanking a teacher', 'asking a neighbor to water the plants',
           'congratulating a friend on a new job', 'apologizing for missing a meeting',
           'asking a manager for a day off', 'welcoming a new team member',
           'inviting friends to a picnic', 'asking a shop about a lost order',
           'thanking a host for dinner', 'asking a librarian about a book',
           'reminding a club about the next meeting', 'congratulating a cousin on a graduation',
           'asking a landlord to fix a leak', 'recommending a restaurant to a friend',
           'introducing yourself to a new pen pal']
NAMED = ['a bakery', 'a pet goldfish', 'a hiking club', 'a bookshop', 'a new board game',
         'a robot vacuum', 'a food truck', 'a school newspaper', 'a garden shop', 'a podcast about science',
         'a yoga studio', 'a sailing boat', 'a band that plays folk music', 'a puppy',
         'a cleaning company']
SCENES = ['a winter morning', 'a busy train station', 'a quiet library', 'a summer storm',
          'a field of sunflowers', 'a city at dawn', 'an old lighthouse', 'a desert at noon',
          'the first snow', 'a market in the morning', 'a mountain lake', 'a rainy afternoon',
          'a lonely road', 'a spring garden', 'a campfire under the stars']
PAIRS = [('a lake', 'a pond'), ('a frog', 'a toad'), ('a crocodile', 'an alligator'),
         ('a star', 'a planet'), ('speed', 'velocity'), ('a simile', 'a metaphor'),
         ('a moth', 'a butterfly'), ('an ocean', 'a sea'), ('a hurricane', 'a tornado'),
         ('a violin', 'a cello'), ('a monkey', 'an ape'), ('a rabbit', 'a hare'),
         ('baking soda', 'baking powder'), ('a city', 'a town'), ('a comet', 'an asteroid'),
         ('hardware', 'software'), ('a debit card', 'a credit card'), ('a poem', 'a song'),
         ('an atom', 'a molecule'), ('a dolphin', 'a shark'), ('a republic', 'a monarchy'),
         ('a laptop', 'a tablet'), ('a novel', 'a short story'), ('a river', 'a stream')]

KINDS = [  # (subjects, templates); the first kind fills the file
    (THINGS, [
        'What is {}?', 'Explain {} in simple terms.', 'How does {} work?',
        'Give me three interesting facts about {}.', 'Write a short paragraph about {}.',
        'What are the advantages and disadvantages of {}?', 'Why is {} important?',
        'Describe {} to a child.', 'Write a short poem about {}.', 'Summarize the history of {}.',
        'What should a beginner know about {}?', 'List some common misconceptions about {}.',
        'Write a short story that involves {}.', 'Can you explain the main ideas behind {}?',
        'What questions do people often ask about {}?', 'How has {} changed over time?',
        'Give an example of {} in everyday life.', 'What would the world be like without {}?',
        'Explain {} in two sentences.', 'Tell me something surprising about {}.',
        'Write a limerick about {}.', 'What are five words that describe {}?',
        'Write a quiz question about {} and give its answer.', 'Why do people like {}?',
        'Describe {} in one paragraph for a school report.', 'What is the future of {}?',
        'Explain {} as if I were ten years old.', 'Write a riddle about {}.',
        'What can we learn from {}?', 'List three facts about {} in bullet points.',
    ]),
    (ACTIVITIES, [
        'Give me three tips for {}.', 'How can I get better at {}?',
        'What do I need to know before {}?', 'What are common mistakes people make when {}?',
        'Make a simple one-week plan for {}.', 'Why is {} worth trying?',
        'What should I buy before {}?', 'Write a short motivational note about {}.',
        'How much time does {} take each week?', 'List five steps for {}.',
    ]),
    (DISHES, ['Give me a recipe for {}.', 'How do I make {}?',
              'What ingredients do I need for {}?', 'Give me a quick version of {}.']),
    (LETTERS, ['Write a short email {}.', 'Write a polite message {}.',
               'Draft a friendly note {}.']),
    (NAMED, ['Suggest three names for {}.', 'Suggest five names for {} and explain one.',
             'Write a short slogan for {}.']),
    (SCENES, ['Write a haiku about {}.', 'Write a short poem about {}.',
              'Describe {} in three sentences.', 'Write the opening line of a story about {}.']),
]
PAIR_TEMPLATES = ['What is the difference between {} and {}?', 'Compare {} and {}.',
                  'How are {} and {} alike, and how are they different?']


def main(argv):
  cli.start(argv, persist=False)  # it takes no flags but --help: any argument is a mistake
  heldout = open(os.path.join(ROOT, 'configs/prompts/instruct_heldout.txt')).read().splitlines()
  rng = random.Random(0)
  about = [t.format(s) for t in KINDS[0][1] for s in KINDS[0][0]]
  rng.shuffle(about)
  lines = [t.format(s) for subjects, templates in KINDS[1:] for t in templates for s in subjects]
  lines += [t.format(a, b) for t in PAIR_TEMPLATES for a, b in PAIRS]
  lines += about[:COUNT - len(lines)]
  rng.shuffle(lines)
  assert not set(lines) & set(heldout) and len(set(lines)) == len(lines) == COUNT
  path = os.path.join(ROOT, 'configs/prompts/instruct_train.txt')
  atomic.write_text(path, '\n'.join(lines) + '\n')  # whole or not at all
  print(f'wrote {len(lines)} prompts to {path}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser())
