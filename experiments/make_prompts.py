"""Writes configs/prompts/instruct_train.txt: user turns for the trunk to answer when it writes the
heads' training data (data.self_prompts), every template below applied to every topic, in a
fixed shuffled order. None of them is, or is about the subject of, a held-out bench prompt
(configs/prompts/instruct_heldout.txt); the script checks that no line repeats one.

Run: python experiments/make_prompts.py
"""

import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEMPLATES = [
    'What is {}?', 'Explain {} in simple terms.', 'How does {} work?',
    'Give me three interesting facts about {}.', 'Write a short paragraph about {}.',
    'What are the advantages and disadvantages of {}?', 'Why is {} important?',
    'Describe {} to a child.', 'Write a short poem about {}.', 'Summarize the history of {}.',
    'What should a beginner know about {}?', 'List some common misconceptions about {}.',
    'Write a short story that involves {}.', 'What are some tips for learning about {}?',
    'Can you explain the main ideas behind {}?', 'Write a friendly note to a friend about {}.',
    'What questions do people often ask about {}?', 'How has {} changed over time?',
    'Give an example of {} in everyday life.', 'What would the world be like without {}?',
]

TOPICS = [
    'volcanoes', 'black holes', 'the Roman Empire', 'recycling paper', 'honey bees',
    'the printing press', 'solar panels', 'the human heart', 'jazz music', 'origami',
    'the Great Wall of China', 'electric cars', 'rainforests', 'the Olympic Games',
    'coral reefs', 'the internet', 'meditation', 'dinosaurs', 'the moon landing', 'earthquakes',
    'penguins', 'the stock market', 'bread baking', 'the piano', 'glaciers', 'friendship',
    'the Renaissance', 'wind turbines', 'migratory birds', 'the immune system', 'chocolate',
    'public libraries', 'the solar system', 'bonsai trees', 'ancient Greece', 'drones',
    'the Amazon river', 'budgeting money', 'tea', 'the telephone', 'deserts', 'yoga',
    'the Industrial Revolution', 'sharks', 'video games', 'the periodic table', 'hiking',
    'democracy', 'lighthouses', 'the French Revolution', 'cheese making', 'umbrellas', 'bees and pollen',
    'mountains', 'the violin', 'space telescopes', 'kindness', 'trains', 'the Sahara',
    'rivers', 'social media', 'the Vikings', 'photography', 'dolphins', 'clean energy',
    'the human skeleton', 'birthday parties', 'castles', 'the ocean tides', 'electricity', 'knitting',
    'elephants', 'the wheel', 'airplanes', 'carbon capture', 'spiders', 'the calendar',
    'museums', 'owls', 'board games', 'the Maya civilization', 'soccer', 'hurricanes', 'maps',
    'the alphabet', 'the Silk Road', 'city parks', 'teamwork', 'snow',
    'the microscope', 'whales', 'cooking rice', 'rockets', 'the Arctic', 'bridges',
    'handwriting', 'the rainbow', 'wolves', 'cities at night', 'books', 'hibernation',
    'the compass', 'coffee', 'forests in autumn', 'music festivals', 'the Internet of Things',
    'marathons', 'magnets', 'bats', 'the Moon', 'farming', 'languages', 'the theater',
    'thunderstorms', 'the Mars rovers', 'sign language', 'pirates', 'coins', 'clocks',
]


def main():
  heldout = open(os.path.join(ROOT, 'configs/prompts/instruct_heldout.txt')).read().splitlines()
  lines = [t.format(topic) for t in TEMPLATES for topic in TOPICS]
  random.Random(0).shuffle(lines)
  assert not set(lines) & set(heldout) and len(set(lines)) == len(lines)
  path = os.path.join(ROOT, 'configs/prompts/instruct_train.txt')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print(f'wrote {len(lines)} prompts to {path}')


if __name__ == '__main__':
  main()
